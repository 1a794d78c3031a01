"""Ablation studies: a study file (spec), its runs on disk (runlog), how runs are launched (launch),
and the statistics of the report (stats). Used by tools/ablation.py and tools/ablation_report.py;
nothing here imports the training loop: runs are separate processes of pretrain_gpt_sv.py."""
