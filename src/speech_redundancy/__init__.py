"""speech_redundancy: do large speech language models need a distinct representation for every speech token?

Data flows one way: config -> data -> model + compression -> generation -> metrics -> results -> tables and figures.
"""

__version__ = "0.1.0"
