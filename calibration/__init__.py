"""spade_edge.calibration: INT8 (Q/DQ) and fp16 models, and anomaly thresholds, from normal images only."""
