"""Evaluation: tasks in, metrics out. Generates through lmlab.infer; never imports lmlab.train.

    lm.py        what an evaluation asks of a model: LM (log-likelihoods, generation through the engine),
                 OpenAIEndpoint (any OpenAI-compatible server)
    task.py      the Task: documents, prompts (k-shot, seeded), scoring; tasks/ holds the benchmarks
    harness.py   evaluate(lm, EvalConfig) -> the results record; markdown and HELM-style tables
    metrics.py   pass@k, ECE, standard errors, majority vote, Cohen's kappa
    sandbox.py   running generated code safely
    perturb.py   typos and casing for robustness
    testtime.py  self-consistency, best-of-N with a verifier, pass@k curves
    judge.py     LLM-as-judge; redteam.py: attacks and attack success rates
    synthetic.py the speedrun's held-out synthetic evaluations
    passkey.py   passkey retrieval at increasing context lengths (long context)
"""
