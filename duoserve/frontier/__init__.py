"""`duoserve frontier`: prune a grid, measure quality and served speed, pick the operating point.

cli (arguments, validation), plan (the grid), steps (the cached subprocess steps), speed (served
measurements through duoserve.loadtest), answers (greedy answers for the rule), rule (the
operating-point rule and the looping detector), report (table, plot, JSON). docs/frontier.md.
"""
