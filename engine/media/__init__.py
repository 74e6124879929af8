"""Pictures and video coming in: input frames for video-to-video (`feed.FrameFeed`).

May import: engine.config and the standard numeric libraries (no model, runtime or server).
"""
