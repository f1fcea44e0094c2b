"""Extension singletons, created unbound and bound to an app in the factory."""
from flask import request
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from common.models import Base

# a handler serialises what it just committed; expiring it on commit would re-read every row
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
DIRECT_SQL = "direct"  # the bind (engine) of the web's hot-path statements, on the same database (web/direct_sql.py)
migrate = Migrate()
jwt = JWTManager()
limiter = Limiter(key_func=get_remote_address, default_limits=[], headers_enabled=True)
RATE_LIMITED_BLUEPRINTS = {"auth"}  # where the @limiter.limit decorators are (login)


@limiter.request_filter
def _has_no_limits() -> bool:
    """Requests outside those blueprints skip the limiter's lookup of their limits (4% of a job submit's CPU)."""
    return request.blueprint not in RATE_LIMITED_BLUEPRINTS
