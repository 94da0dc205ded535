"""The studies: what the stages achieve, measured from their checkpoints, each run as `python -m studies.X`.

    report.py       the journey: every stage on the same measures and prompts (the last step of make demo);
                    report_writing.py writes what it measured as report.md, report.json and the figures
    seeds.py        every figure of the report on several seeds, with its minimum and median (make seeds)
    hacking.py      reward hacking seen and prevented (make hacking)
    forgetting.py   what each way of fine-tuning gains and forgets (make forgetting)
    docs.py         docs/example/ and every picture in docs/, rewritten from a demo's out/ (make docs)
"""
