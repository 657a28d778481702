"""Test models built locally: the faithful MiniCPM-V stand-in and the real SmolLM2-135M checkpoint."""
