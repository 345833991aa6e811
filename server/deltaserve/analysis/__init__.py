"""The unified view of delta editing: Riemann-sum loss-change analysis of edits (`deltaserve analyze`)."""
