"""Command-line front ends: training, the study, the launcher wrapper (see each module)."""
