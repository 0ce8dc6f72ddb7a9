"""What a person opens: the lens grid (CSV, HTML, PNG), the report page and the plots."""
