"""The app pin of spikefed-client (`sitecustomize.py`: see its docstring)."""
