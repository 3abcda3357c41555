"""Finished response → settled charge and ledger event: the reservation book, the
settlement service and its resend, late refunds, pricing, the charge at the bound."""
