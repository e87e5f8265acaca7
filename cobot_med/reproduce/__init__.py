"""Reproducing the paper's tables from public data: ``cobot-med reproduce table4`` (:mod:`.table4`), its recipe
(:mod:`.recipe`) and its time estimate from measured throughput (:mod:`.estimate`)."""
