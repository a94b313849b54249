"""Spend: prices, per-token budgets, the durable usage ledger and its reports (issue: budgets)."""
