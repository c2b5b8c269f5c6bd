"""`qlora-kit eval`: base vs tuned on held-out questions, and the report a domain expert reads.

    metrics        score(task, ...): the generic metrics plus the task's domain family (domains.py), aggregate()
    generic        exact match, character ROUGE-L and BLEU (every task)
    citations      statute citations (legal)
    json_fields    JSON answers, field by field, and the valid-JSON rates under a constraint (finance)
    key_terms      key terms of the reference found in the answer (medical, industrial)
    contradiction  the answer says the opposite of the reference (key_terms' second metric)
    numerals       Chinese numerals; quantities: numbers with units (shared by the families above)
    evaluate       the command: answer with base and tuned, score, write eval.json and the report;
                   grade(): graded review sheets read back into the report
    report         report.md, report.html, plots/
    grades         the blind review sheet, reading graded sheets, agreement statistics

A metric family is a module with LABELS (key -> (label, higher is better)), PRIMARY (the key the
report ranks examples by) and scores(pred, ref, glossary); READS_JSON when its answers are JSON.
Importing this package imports none of them (evaluate loads torch when it runs).
"""
