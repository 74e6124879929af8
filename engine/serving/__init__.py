"""Streams for viewers: live streams whose prompt changes mid-stream, many sessions on one model,
the web server and its protocol, the client, MP4 files.

May import: engine.runtime and below. Main entry points: `live.LiveStream`,
`sessions.SessionManager`, `server.StreamServer`, `client` (`python -m engine.client`),
`video.Mp4Writer`.
"""
