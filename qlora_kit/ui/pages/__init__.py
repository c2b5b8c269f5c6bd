"""The ui's HTTP routes, one APIRouter per page of the single-page app; what each route does lives in
the ui module named after it (runs, newrun, jobs, chatting, downloads, uploads), and what the process
holds is one ui.state.UiState, given to every route as a dependency.

    session   /, /favicon.ico, /api/session, /api/logout
    runs      /api/runs, /api/run, /api/run/progress, /run/report        (#/runs, #/run/NAME)
    new       /api/recipes, /api/check, /api/start                        (#/new)
    jobs      /api/run/stop, /api/run/resume, /api/run/job (POST, DELETE)
    chat      /api/adapters, /api/chat                                    (#/chat)
    files     /api/run/file, /api/uploads
"""
