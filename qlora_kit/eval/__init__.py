"""`qlora-kit eval`: base vs tuned on held-out questions, and the report a domain expert reads.

    metrics      the metric dispatch: generic metrics for every task, plus the domain's family
    generic      exact match, character ROUGE-L and BLEU (every task)
    citations    statute citations (legal)
    json_fields  JSON answers, field by field (finance)
    key_terms    key terms and contradictions (medical, industrial)
    evaluate     the command: answer with base and tuned, score, write eval.json and the report
    report       report.md, report.html, plots/
    grades       the blind review sheet and the human grades read back

Importing this package imports none of them (evaluate loads torch when it runs).
"""
