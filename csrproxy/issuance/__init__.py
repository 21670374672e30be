"""From a checked CSR to a chain: CSR checks, name policy, admission budgets, the issuer
(coalescing, cache, an order's life), the ledger, recovery and renewal."""
