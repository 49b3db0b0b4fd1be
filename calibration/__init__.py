"""spade_edge.calibration: INT8 (Q/DQ), fp16 and anomaly thresholds, from normal images only."""
