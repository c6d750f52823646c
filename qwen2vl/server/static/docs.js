// Swagger UI for /docs (serve --docs): the OpenAPI document of this server.
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
