"""rules/report.smk: the report pages and tables (report_tables) and the run summary."""
