"""Locust entry point (see loadtest/llm_load.py); pick the pattern with a shape file:

locust -f loadtest/locustfile.py,loadtest/shapes/bursty.py --headless -H http://127.0.0.1:8000
"""

from loadtest.llm_load import LLMUser  # noqa: F401  (Locust collects the User class from here)
