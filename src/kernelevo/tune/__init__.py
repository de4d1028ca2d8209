"""Tuning: workloads, verification, timing, the measurement database, distillation."""
