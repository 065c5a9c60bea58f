"""The ops console (`intergiro-receiver ops`): pages and a JSON API for operators (see app.py)."""
