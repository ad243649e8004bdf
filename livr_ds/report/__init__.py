"""`livr-ds report`: what a run did, as plots and tables (write.py has the whole story).

    run.py       reading a run: stages, metrics.jsonl, exports, results under it
    tables.py    the runs, validation per checkpoint, results beside the paper's Table 1, configs
    plots.py     training, validation and throughput PNGs (matplotlib Agg)
    document.py  one document model, rendered to markdown and to self-contained HTML
    write.py     write_report and the CLI
"""
