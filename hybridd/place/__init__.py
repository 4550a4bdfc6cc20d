"""Pure placement: fitting layers onto devices, predicting speed, the scheduling decision.

Nothing here does I/O, imports asyncio, logs, or touches a GPU library. Time is an argument.
"""
