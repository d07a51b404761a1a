"""The query service over a finished index (Ray Serve HTTP) and its request protocol."""
