"""
One inference request's stages: identify -> resolve and govern -> relay ->
meter.  L{proxy} drives them; L{relay} pipes the provider's answer back;
L{metering} settles the books.
"""
