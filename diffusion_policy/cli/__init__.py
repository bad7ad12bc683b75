"""The `dp` command line: `main.py` dispatches to one module per verb. Library code never imports this package."""
