"""The kubectl exec-credential shim for brokerd.  Stdlib only; imports nothing from brokerd."""
