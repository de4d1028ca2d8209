"""Evolution of whole .kevo heuristic programs (`kernelevo evolve`), AlphaEvolve/OpenEvolve
style: proposals from an LLM behind any OpenAI-compatible endpoint or from offline
structural mutation, fitted on training shapes (`kernelevo score`'s fitness), chosen on
held-out shapes, re-timed in fresh workers before they are written.

    store.py    the program database (runs, proposals with prompt and reply, programs)
    archive.py  islands, the quality-diversity grid, parent sampling, migration
    fitness.py  checking and scoring a proposed program
    mutate.py   the offline proposer (AST mutation and crossover)
    prompt.py   what the LLM proposer is told
    llm.py      requests through the openai client; replies to programs
    loop.py     the loop, its budgets, resuming, and the winner
    report.py   `kernelevo evolve report`
"""
