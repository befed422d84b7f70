"""Model sizing: exact parameter and FLOP accounting (accounting.py), the iso-FLOP dense and
iso-sparse MoE searches (search.py) and the baseline config files they write
(baseline_configs.py)."""
