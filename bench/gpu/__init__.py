"""The GPU run: its wheel list (wheel_set) and its parts (run); see run.sh."""
