"""The app's pages: scripts run by ``st.navigation`` (see :func:`bench.app.ui.run_app`), never imported.

This file only makes the folder part of the installed package.
"""
