from stagewise.tracking.tracker import SINKS, Tracker, format_metrics_line, progress, read_metrics

__all__ = ["SINKS", "Tracker", "format_metrics_line", "progress", "read_metrics"]
