"""Reports read from a ledger: ``summary`` (the text and JSON report of ``milliwatt report``)
and ``html`` (the analyst page with charts). They read the ledger; they never write it."""
