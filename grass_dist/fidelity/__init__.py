"""Linear datamodeling score (LDS): ground truth by retraining on subsets, and the metric.

`metric` needs only numpy, so benchmark environments without Ray can import it.
"""
