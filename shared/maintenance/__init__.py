"""Maintenance: the periodic sweep that puts back what fell through the cracks (sweep) and the purge
of finished tasks past their retention (retention)."""
