"""The station: operator page, live events, and the line's inputs (sources) and outputs (sinks).

Sits on top of ``spade_edge.serve``: sources feed images into its ``InspectionService``, sinks
receive every archived verdict through ``service.add_listener``. Protocol libraries (paho-mqtt,
asyncua, OpenCV, harvesters) are imported only inside the module that needs them.
"""
