"""The foundations beneath recorder/ and replayer/: where a log lives (urls), the Kafka
plumbing and topic names (kafka), the one reader of a log topic (topic_reader), guest
images (guest_images), what record and replay both compute to check each other (verify),
and small shared pieces (percentiles, requests, paths, version).

Imports go one way: this package imports only schemas/ and libkvmrr/, never the
recorder, the replayer or the application.  docs/ARCHITECTURE.md draws the layers.
"""
