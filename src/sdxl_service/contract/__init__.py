"""What crosses between the HTTP process and the render workers, written once.

Both sides import this package and nothing of each other: the job and outcome
types, the render stream's wire format, the render call, and the registry of
the workers' states.
"""
