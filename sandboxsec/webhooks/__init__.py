"""Per-tenant webhooks: Standard Webhooks signatures and a persistent, retrying outbox."""
