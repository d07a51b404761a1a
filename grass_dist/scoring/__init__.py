"""Scoring: the preconditioner (`precondition`), streaming scores with a running top-k
(`score`, `topk`), dense tiles of scores with their top-k (`tiles`), result tables
(`results`) and ensembles (`ensemble`).
"""
