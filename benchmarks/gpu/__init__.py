"""The one command for a GPU machine (``run.sh``) and its bookkeeping (``report``)."""
