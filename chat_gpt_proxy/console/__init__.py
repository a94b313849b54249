"""The admin console's back end: tokens managed at run time, the audit of admin actions, the
per-request view of the ledger, and budget alerts.

- ``store``: the tables beside the ledger's (SQLite or PostgreSQL, USAGE_DATABASE).
- ``runtime``: the tokens the admin API manages, kept in step in every worker and instance.
- ``alerts``: the budget webhook (ALERT_WEBHOOK_URL).
"""
