"""The one command for a lent GPU (``run.sh``) and its bookkeeping (``report``)."""
