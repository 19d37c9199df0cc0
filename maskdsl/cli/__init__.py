"""The command line (``python -m maskdsl`` / ``maskdsl``) and its pictures (terminal, PNG)."""
