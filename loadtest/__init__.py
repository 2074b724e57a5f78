"""Load test (locustfile) and its SLO report."""
