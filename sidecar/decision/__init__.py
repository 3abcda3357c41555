"""Request → decision: the tenant, the estimate, the providers in routing order, the
backend's answer or the failure mode, the admission queue."""
