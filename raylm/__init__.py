"""What raylm's three tools (dataprep, trainer, tune) share."""
