"""Fixed option values of the model side, importable without torch (the command line lists them as choices)."""

KV_MODES = ("per_depth", "shared")
EXIT_STRATEGIES = ("threshold", "cdf", "convergence", "kl")
# The threshold each exit strategy uses when none is given.
DEFAULT_THRESHOLDS = {"threshold": 0.9, "cdf": 0.9, "convergence": 0.05, "kl": 0.01}
# Calibration tokens the split analysis reads by default: fewer move the encoder boundary of Gemma 3 270M
# and the chosen split gets worse (docs/RESULTS.md, "Split choice").
CALIBRATION_TOKENS = 2048
