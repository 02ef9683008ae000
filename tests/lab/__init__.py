"""The two-host network-namespace lab (lab.py) and its tests."""
