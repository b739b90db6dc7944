"""bayesal dashboard: a Streamlit app over the campaign database (read-only)."""
